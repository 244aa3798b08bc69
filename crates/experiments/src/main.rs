//! `experiments NAME [--out DIR] [options]`, run as `cargo xtask experiment`.
//! Exit codes: 0 success, 1 the experiment failed, 2 a malformed command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match experiments::dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(recipes::flags::exit_code(e.as_ref()))
        }
    }
}
