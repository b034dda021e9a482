"""``imgserve submit``: a job per source, sent and followed with imgserve.client.

plan.py decides what to send (sources, the job, --resume keys), run.py sends and
waits (bounded concurrency, one shared event stream, Ctrl-C), report.py shows it
(rich progress or plain lines, the summary), cli.py holds the flags.
"""
