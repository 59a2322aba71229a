"""``workerpool score``: batch scoring of large files with a Pool, streamed and resumable.

    readers (input files -> chunks) -> run (chunks -> pool -> parts; parts -> output)
    parts (the crash-safe directory, its manifest) ; outputs (predict's result -> columns,
    parts -> the output file) ; progress (bar or log lines) ; main (command line, exit codes)

``workerpool.score(pool, source, sink, ...)`` is :func:`run.score`.
"""
