//! Entry points for fuzz targets and their corpus replay.
