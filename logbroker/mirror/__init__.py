"""`logbroker mirror`: copy topics from one cluster to another, a client process (issue 21, item 4).

    naming.py      which source topics are mirrored and their names on the target (pure)
    progress.py    the `logbroker.mirror.src` header: the mirror's progress, stored in the target (pure)
    offset_map.py  source offset -> target offset per partition, for group offset translation (pure)
    mirror.py      the shell: a consumer group on the source, an idempotent producer on the target
    status.py      --status-port: the last lag report as JSON over HTTP
    command.py     the CLI
"""
