//! Headers exchange matching.
