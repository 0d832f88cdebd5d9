//! `fanout`: the gateway's command. All of it lives in the library: [`fanout::app::main`].

/// mimalloc instead of glibc's malloc: a Pingora proxy spends a tenth of its time in the
/// allocator, and mimalloc's thread-local free lists make those calls several times cheaper
/// (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(fanout::app::main());
}
