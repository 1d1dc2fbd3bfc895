"""Errors raised by the data layer."""


class DatasetNotPreparedError(ValueError):
  """A TFDS dataset is missing (or not in array_record format) under data_dir.

  The message says where we looked and how to prepare the dataset. We never
  download anything ourselves: preparation is an explicit, separate step.
  """
