"""Send one message three times through Python's smtplib. Prints the reply
to each DATA as "CODE TEXT".

usage: send.py PORT MODE [USER PASSWORD]
MODE:
  key      one message with an X-Idempotency-Key, sent three times as it is
           (a client retrying after a lost reply, a queue redelivering a
           rendered message)
  rebuilt  the same email with the same key, built afresh for each attempt
           (a task run again): new Message-ID, Date and MIME boundary
  plain    built afresh for each attempt, without a key

The bytes are given to smtplib as msg.as_bytes() makes them, with bare LF
line endings, which smtplib sends unchanged: a real client that does so.
"""
import smtplib
import sys
from email.message import EmailMessage
from email.utils import make_msgid, formatdate

port, mode = int(sys.argv[1]), sys.argv[2]
user = sys.argv[3] if len(sys.argv) > 3 else None

with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
    s.ehlo("python.test")
    if user:
        s.login(user, sys.argv[4])
    def build():
        m = EmailMessage()
        m["From"] = "Shop <shop@example.com>"
        m["To"] = "Ann <ann@example.net>"
        m["Subject"] = "Ihre Bestellung ist unterwegs – Grüße aus dem Shop, diesmal mit einer recht langen Betreffzeile"
        m["Message-ID"] = make_msgid(domain="app.example.com")
        m["Date"] = formatdate(localtime=True)
        if mode in ("key", "rebuilt"):
            m["X-Idempotency-Key"] = "order-1001-shipped"
        m.set_content("Grüße, Ann!\nYour order 1001 has shipped.\n")
        m.add_alternative("<p>Grüße, Ann!</p><p>Your order 1001 has shipped.</p>", subtype="html")
        return m.as_bytes()

    once = build()
    for attempt in range(3):
        data = once if mode == "key" else build()
        s.mail("shop@example.com")
        s.rcpt("ann@example.net")
        code, text = s.data(data)
        print(code, text.decode())
