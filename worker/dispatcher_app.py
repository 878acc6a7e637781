"""The dispatcher's Celery app: consumes webhook delivery ids on their own queue.

It runs a thread pool (`darkroom dispatcher`), so one slow receiver holds one thread for at
most the attempt timeout, and never a GPU. It imports no torch.
"""

from __future__ import annotations

from darkroom.logs import install_celery_logging
from darkroom.metrics import serve_metrics_in_worker
from darkroom.outbound import new_client
from darkroom.queue import DELIVER_WEBHOOK_TASK, make_celery
from darkroom.settings import get_settings
from worker.webhooks.dispatcher import deliver

settings = get_settings()
app = make_celery(settings, "darkroom-dispatcher")
install_celery_logging(settings.log_format, settings.log_level)
serve_metrics_in_worker(settings.dispatcher_metrics_port, settings.metrics_host)
# Acknowledge deliveries on receipt. The delivery row (its lease and due time) is what keeps a
# webhook safe: if this process dies mid-attempt the sweeper publishes it again. Late acks would
# add nothing, and kombu's restore of unacked messages on a broker disconnect crashes the whole
# worker (kombu 5.7: AttributeError in the Redis transport's _connparams), sweeper included.
app.conf.task_acks_late = False
app.conf.task_reject_on_worker_lost = False

# Shared by the pool's threads (httpx clients are thread-safe); redirects are never followed.
# Its connections honour each attempt's overall deadline (see darkroom.outbound).
client = new_client(settings.webhook_timeout_s)


@app.task(name=DELIVER_WEBHOOK_TASK)
def deliver_webhook_task(delivery_id: int) -> None:
    """Thin shell: everything happens in worker.webhooks.dispatcher.deliver."""
    deliver(delivery_id, settings, client)
