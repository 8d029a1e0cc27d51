"""Queue welcome emails through Celery, as a web application would.

usage: python3 send.py N
Queues N tasks and prints each task id. The first task is queued a second
time with the same id, as Celery does when a worker dies before its ack
(acks_late): sendonce must send it once.
"""

import sys

from tasks import send_welcome_email

n = int(sys.argv[1])
ids = []
for i in range(n):
    r = send_welcome_email.apply_async(args=["user%d@example.com" % i, "User %d" % i])
    ids.append(r.id)
send_welcome_email.apply_async(args=["user0@example.com", "User 0"], task_id=ids[0])
for task_id in ids:
    print(task_id)
