"""The broker: everything spoken to RabbitMQ. The only package that imports aio-pika/aiormq.

- ``connection``: connection parameters, connections, the outage watch and its log filter.
- ``consumer``: intake: prefetch, one owned task per delivery, the only place that acks jobs.
- ``publisher``: the push queue: confirmed publishes.
- ``lanes``: the priority lane and the mover that fills it from the listen queue.
- ``batches``: the mover's publishes, written a loop turn's worth at a time.
"""
