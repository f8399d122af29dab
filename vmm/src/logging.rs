//! Log set-up: verbosity from the command line (`-v`), overridable with `RUST_LOG`.

/// Starts the logger: 0 = warn, 1 = info, 2 = debug, 3+ = trace. `RUST_LOG` wins when set.
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let env = env_logger::Env::default().default_filter_or(level);
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}
