"""Sub-commands of the ``orcal`` command line (see :mod:`orcal.cli`)."""
