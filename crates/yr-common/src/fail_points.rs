//! Fail points for fault tests: each yr process reads its own from the `FAILPOINTS`
//! environment variable (`name=actions;name=actions`, the `fail` crate's syntax). The points
//! themselves are `fail::fail_point!` in the crates that own the recovery paths, and compile to
//! nothing unless the build enables the `failpoints` feature (the fault tests' build does;
//! no release does). See docs/design/013-fail-points-and-clock.md.

/// The environment variable a process reads its fail points from.
pub const ENV: &str = "FAILPOINTS";

/// Configure the fail points `FAILPOINTS` names. Nothing to do when it is unset. An error, to
/// be shown to whoever started the process, when it is set but this binary was built without
/// fail points (the test would silently prove nothing), or an entry does not parse.
pub fn setup_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    if spec.trim().is_empty() {
        return Ok(());
    }
    if !fail::has_failpoints() {
        return Err(format!(
            "{ENV} is set ({spec}) but this binary was built without fail points; build it with \
             the `failpoints` feature (`cargo build -p yr-cli --features failpoints`)"
        ));
    }
    configure(&spec)
}

/// Configure each `name=actions` entry of `spec` (separated by `;`).
pub fn configure(spec: &str) -> Result<(), String> {
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| format!("the fail point entry {entry:?} is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim())
            .map_err(|e| format!("cannot configure the fail point {name}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_entry_is_refused() {
        let error = configure("no-equals-sign").unwrap_err();
        assert!(error.contains("name=actions"), "{error}");
        let error = configure("yr_common::test_point=nonsense(").unwrap_err();
        assert!(error.contains("test_point"), "{error}");
    }
}
