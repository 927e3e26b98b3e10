//! Entry points for the fuzz targets (fuzz/): each takes arbitrary bytes and must never
//! panic, whatever they hold.
