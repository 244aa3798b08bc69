//! tensor-core's test suite, one binary (each test executable links libtorch,
//! so fewer binaries keep the build quick).

mod grouped;
mod io;
mod layers;
mod linking;
mod module;
mod testing;
