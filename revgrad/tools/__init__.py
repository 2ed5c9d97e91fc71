"""The ``revgrad`` command (``cli``: ``demo``, ``doctor``, ``bench``) and what it measures with:
``memory`` (bytes held and peaks), ``measure`` (timing, largest batch, the machine), ``benchmark``
(workloads and providers) and ``benchrun`` (``revgrad bench``)."""
