//! Helper of `no_leaks`: a driver that finds no cluster (no server address, no local mode, a
//! session root of its own) and so starts a temporary one. It creates an instance and calls a
//! function, printing `INSTANCE_RUNTIME <pid>` and `FUNCTION_RUNTIME <pid>`. `YR_TESTS_DRIVER_MODE`
//! says whether it then exits (`exit`, when its stdin closes) or blocks with a call in flight
//! until it is killed (`block`). Its runtimes re-execute it: `yr::init` serves there.

use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

#[yr::instance]
pub struct Napper {
    naps: u32,
}

#[yr::instance]
impl Napper {
    pub fn new() -> Self {
        Napper { naps: 0 }
    }

    pub fn pid(&self) -> u32 {
        std::process::id()
    }

    pub fn nap(&mut self, ms: u64) -> u32 {
        std::thread::sleep(Duration::from_millis(ms));
        self.naps += 1;
        self.naps
    }
}

#[yr::invoke]
fn runtime_pid() -> u32 {
    std::process::id()
}

fn main() {
    let mut config = yr::Config::default();
    config.local_mode = false;
    config.server_address = None;
    yr::init(config).expect("init starts a temporary cluster");
    let napper = yr::instance(Napper::new).invoke(()).unwrap();
    let pid = yr::get(&napper.method(Napper::pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    println!("INSTANCE_RUNTIME {pid}");
    let stateless = yr::get(&yr::function(runtime_pid).invoke(()).unwrap(), TIMEOUT).unwrap();
    println!("FUNCTION_RUNTIME {stateless}");
    if std::env::var("YR_TESTS_DRIVER_MODE").as_deref() == Ok("block") {
        let _in_flight = napper.method(Napper::nap).invoke((600_000,)).unwrap();
        println!("READY");
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    assert_eq!(
        yr::get(&napper.method(Napper::nap).invoke((10,)).unwrap(), TIMEOUT).unwrap(),
        1
    );
    // Let the test look at the running cluster, then exit when it says so.
    println!("READY");
    let mut go = String::new();
    let _ = std::io::stdin().read_line(&mut go);
    yr::finalize().unwrap();
}
