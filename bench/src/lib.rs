//! The library half of `cleave-bench`: pieces other crates' tests reuse. Today that is the
//! link emulator ([`link`]), a TCP proxy that makes loopback behave like a slow, delayed,
//! sometimes broken edge link. The benchmarks themselves live in the binary.

pub mod link;
