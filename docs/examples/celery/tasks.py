"""A Celery application that hands its emails to sendonce.

The task does not talk to an SMTP server. It publishes the email as a
sendonce job (docs/jobs.md) to a RabbitMQ queue that sendonce consumes,
with the Celery task id as the job's key. Celery delivers a task at least
once: with acks_late a worker that dies mid-task gets the task again, with
the same id, and publishes the same job again. sendonce answers the second
one as a duplicate: the user gets one email.

Configuration, from the environment:
  CELERY_BROKER_URL   Celery's own broker (default amqp://guest:guest@127.0.0.1:5672//)
  CELERY_QUEUE        the queue of Celery's tasks (default celery)
  SENDONCE_AMQP_URL   where sendonce's queue is (default: CELERY_BROKER_URL)
  SENDONCE_QUEUE      sendonce's queue (default emails)
  SENDONCE_DLX        its dead-letter exchange (default emails.dlx)
"""

import json
import os

from celery import Celery
from kombu import Connection, Exchange, Queue

BROKER = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
SENDONCE_AMQP_URL = os.environ.get("SENDONCE_AMQP_URL", BROKER)
SENDONCE_QUEUE = os.environ.get("SENDONCE_QUEUE", "emails")
SENDONCE_DLX = os.environ.get("SENDONCE_DLX", "emails.dlx")

app = Celery("tasks", broker=BROKER)
app.conf.update(
    task_default_queue=os.environ.get("CELERY_QUEUE", "celery"),
    task_acks_late=True,  # a task whose worker dies is delivered again
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

# sendonce's queue: durable, with a dead-letter exchange for jobs that
# can never be sent (sendonce refuses a queue without one).
dead_letters = Exchange(SENDONCE_DLX, type="fanout", durable=True)
emails = Queue(
    SENDONCE_QUEUE,
    exchange=Exchange("", type="direct"),
    routing_key=SENDONCE_QUEUE,
    durable=True,
    queue_arguments={"x-dead-letter-exchange": SENDONCE_DLX},
)
dead = Queue(SENDONCE_QUEUE + ".dead", exchange=dead_letters, routing_key="", durable=True)


def publish_job(job, key):
    """Publish one job, persistent, and return once the broker confirmed it."""
    with Connection(SENDONCE_AMQP_URL, transport_options={"confirm_publish": True}) as conn:
        producer = conn.Producer()
        producer.publish(
            json.dumps(job).encode(),
            content_type="application/json",
            content_encoding="utf-8",
            exchange="",
            routing_key=SENDONCE_QUEUE,
            message_id=key,  # sendonce's broker key too
            delivery_mode=2,
            declare=[dead_letters, dead, emails],
            retry=True,
        )


@app.task(bind=True)
def send_welcome_email(self, address, name):
    job = {
        "key": self.request.id,  # the same task, run again, is the same email
        "from": "Example <noreply@example.org>",
        "to": [address],
        "subject": "Welcome, " + name,
        "text": "Hello " + name + ", your account is ready.",
        "tags": {"celery_task": self.name},
    }
    publish_job(job, self.request.id)
    return self.request.id
