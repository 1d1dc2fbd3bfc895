"""Errors raised by the data layer."""


class DatasetNotPreparedError(ValueError):
  """A TFDS dataset is missing (or not in array_record format) under data_dir.

  The message says where we looked and how to prepare the dataset. We never
  download anything ourselves: preparation is an explicit, separate step.
  """


class DataError(ValueError):
  """Input data that cannot be used as configured; the message names the problem and the fix.

  A user error (mmd_jax.errors.USER_ERRORS): the command line prints it and exits with 2.
  """


class IteratorStateMismatchError(DataError):
  """A saved data-iterator state (in a checkpoint) describes another input stream than the
  current config's (another seed, data set, split or global batch size), so resuming would not
  reproduce the same batches."""
