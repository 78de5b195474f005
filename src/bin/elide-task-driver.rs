//! The Nomad task driver plugin binary: Nomad launches it; everything lives in the library.

fn main() {
    std::process::exit(elide_task_driver::nomad::run());
}
