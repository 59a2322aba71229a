"""The parent side: the Pool API, dispatch, supervision, weight publication."""
