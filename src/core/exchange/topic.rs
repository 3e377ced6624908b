//! Topic exchange matching.
