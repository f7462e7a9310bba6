//! openYuanrong's quickstart, stateful: three instances each save 9 and it prints `[9, 9, 9]`.
//!
//! ```text
//! cargo run --release --example counter
//! ```

use std::time::Duration;

#[yr::instance]
struct Object {
    value: i32,
}

#[yr::instance]
impl Object {
    fn new() -> Self {
        Object { value: 0 }
    }

    fn save(&mut self, value: i32) {
        self.value = value;
    }

    fn get(&self) -> i32 {
        self.value
    }
}

fn main() -> Result<(), yr::Error> {
    yr::init(yr::Config::default())?;
    let objects = (0..3)
        .map(|_| yr::instance(Object::new).invoke(()))
        .collect::<Result<Vec<_>, _>>()?;
    for object in &objects {
        object.method(Object::save).invoke((9,))?;
    }
    let values = objects
        .iter()
        .map(|object| object.method(Object::get).invoke(()))
        .collect::<Result<Vec<_>, _>>()?;
    println!("{:?}", yr::get_all(&values, Duration::from_secs(30))?);
    for object in &objects {
        object.terminate()?;
    }
    yr::finalize()
}
