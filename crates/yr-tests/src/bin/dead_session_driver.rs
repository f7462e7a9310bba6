//! Helper of `security_cli`'s `a_driver_whose_session_died_fails_with_4002_naming_the_session`:
//! a driver that finds its cluster through `YR_SESSION_ROOT` only. Prints `INIT_OK`, or
//! `INIT_ERROR <code> <message>`.

fn main() {
    let mut config = yr::Config::default();
    config.local_mode = false;
    config.server_address = None;
    match yr::init(config) {
        Ok(_) => println!("INIT_OK"),
        Err(error) => println!("INIT_ERROR {} {error}", error.code().number()),
    }
}
