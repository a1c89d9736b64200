//! Prints the README's Configuration table from the one declaration of the
//! settings (`src/config.rs`): `cargo run -q --example settings_table`.
//! `tests/docs.rs` fails until the README shows this table.

fn main() {
    print!("{}", ingest::config::markdown_table());
}
