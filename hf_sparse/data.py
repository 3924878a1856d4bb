"""The old home of the embedded data, kept so that `from hf_sparse.data import ...` goes on working: everything
here is `hf_sparse.tasks` (see CHANGELOG.md, 0.2.0). New code imports `hf_sparse.tasks`."""

from . import tasks
from .tasks import *  # noqa: F401,F403

__all__ = list(tasks.__all__)
