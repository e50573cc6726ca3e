"""pytest plugin of flowplugins (entry point ``pytest11: flowplugins``).

It gives a plugin package's test suite the project's property checks in one line::

    def test_my_bijectors(flowplugins_check):
        flowplugins_check("my_bijector")          # every backend, a few event shapes

``flowplugins_check`` is :func:`flowplugins.testing.check_registered`; pass a registry name, a
:class:`~flowplugins.Bijector` subclass or a factory. The plugin is loaded by every pytest run in
an environment where flowplugins is installed, so this module imports nothing heavy: torch and
the checks are imported when the fixture is first used, and it adds no command-line options
(a project's own ``conftest.py`` stays free to define ``--device`` or ``--dtype``).
"""

from __future__ import annotations

import pytest

__all__ = ["flowplugins_check"]


@pytest.fixture
def flowplugins_check():
    """The one-line property checker :func:`flowplugins.testing.check_registered`."""
    from flowplugins.testing import check_registered

    return check_registered
