"""The child side: the zygote that forks workers, and the worker's attach/serve loop."""
