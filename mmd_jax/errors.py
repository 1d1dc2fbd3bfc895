"""The errors a user can cause, gathered so the command line reports them without a traceback,
and the command line's exit codes (README, "Reliability")."""
from mmd_jax.config_lib import ConfigError
from mmd_jax.data.errors import DataError, DatasetNotPreparedError
from mmd_jax.parallel.mesh import MeshError
from mmd_jax.runs.student import TeacherError
from mmd_jax.training.checkpoint import CheckpointError, NonFiniteStateError

USER_ERRORS = (ConfigError, DatasetNotPreparedError, DataError, MeshError, CheckpointError,
               TeacherError)
# A non-finite loss, gradient or state (loop.NonFiniteLossError, checkpoint.NonFiniteStateError):
# not the user's input, and not worth an automatic restart either.
NONFINITE_ERRORS = (FloatingPointError, NonFiniteStateError)

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): saved a checkpoint; rerun the same command
