"""Calls (dbaas.rpc) on a real RabbitMQ: the answer waits in the caller's reply queue even
when it comes before the caller begins to wait, as the conductor's does."""

from celery import Celery
from celery._state import _set_task_join_will_block
from kombu import Connection, Exchange, Producer, Queue


def test_an_answer_sent_before_the_caller_waits_reaches_it_in_a_pool_process(rabbit):
    app = Celery("calls", broker=rabbit.url, backend="dbaas.rpc:ReplyBackend",
                 set_as_current=False)
    app.conf.update(result_persistent=False, task_serializer="json", result_serializer="json",
                    accept_content=["json"], result_accept_content=["json"])
    requests = Queue("rpc-test-requests", Exchange("rpc-test-requests", "direct"), "rpc-test-requests")
    app.conf.task_routes = {"rpc_test.echo": {"queue": requests}}
    with Connection(rabbit.url) as conn:
        requests(conn.default_channel).declare()
    # What a prefork pool process is to Celery (the taskmanager's reconcile calls from one).
    _set_task_join_will_block(True)
    try:
        result = app.send_task("rpc_test.echo", args=[1], ignore_result=False)
        with Connection(rabbit.url) as conn:
            message = conn.SimpleQueue(requests).get(timeout=10)
            reply_to = message.properties["reply_to"]
            Producer(conn.default_channel).publish(
                {"task_id": result.id, "status": "SUCCESS", "result": {"result": "pong"},
                 "traceback": None, "children": []},
                exchange="", routing_key=reply_to, correlation_id=result.id, serializer="json")
            message.ack()
        assert result.get(timeout=10, disable_sync_subtasks=False) == {"result": "pong"}
    finally:
        _set_task_join_will_block(False)
        app.close()
