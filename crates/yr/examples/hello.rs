//! openYuanrong's quickstart, stateless: `say_hello` invoked three times prints three greetings.
//!
//! ```text
//! cargo run --release --example hello
//! ```

use std::time::Duration;

#[yr::invoke]
fn say_hello(name: String) -> String {
    format!("hello, {name}")
}

fn main() -> Result<(), yr::Error> {
    yr::init(yr::Config::default())?;
    let refs = (0..3)
        .map(|_| yr::function(say_hello).invoke(("yuanrong",)))
        .collect::<Result<Vec<_>, _>>()?;
    let greetings = yr::get_all(&refs, Duration::from_secs(30))?;
    println!("{greetings:?}");
    yr::finalize()
}
