//! System tests: coffre against the real cryptsetup binary, its LUKS2
//! oracle. Run by `scripts/test`, which installs cryptsetup-bin.

mod damage;
mod from_cryptsetup;
mod to_cryptsetup;
mod util;
mod validation;
mod volume_cli;
