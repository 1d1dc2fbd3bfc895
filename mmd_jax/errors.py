"""The errors a user can cause, gathered so the command line reports them without a traceback."""
from mmd_jax.config_lib import ConfigError
from mmd_jax.data.errors import DatasetNotPreparedError
from mmd_jax.parallel.mesh import MeshError
from mmd_jax.distill.teacher import TeacherError
from mmd_jax.training.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, DatasetNotPreparedError, MeshError, CheckpointError, TeacherError,
               FloatingPointError)
