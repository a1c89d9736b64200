//! The README says what the code does: its settings table is the one
//! declaration in `src/config.rs`, and its error table lists exactly the
//! refusals `Rejection` can send.

use ingest::http::Rejection;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// The lines of the first Markdown table after `heading`.
fn table_after(text: &str, heading: &str) -> Vec<String> {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    text[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_settings_table_is_the_declaration() {
    let readme = readme();
    let got = table_after(&readme, "## Configuration").join("\n");
    let want = ingest::config::markdown_table();
    assert_eq!(
        got,
        want.trim_end(),
        "README.md's Configuration table differs from src/config.rs; replace it with the output of `cargo run -q --example settings_table`:\n{want}"
    );
}

#[test]
fn the_error_table_lists_every_rejection() {
    let readme = readme();
    let mut listed: Vec<(u16, String)> = table_after(&readme, "### Errors")
        .iter()
        .skip(2)
        .filter_map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let status: u16 = cells.get(1)?.get(..3)?.parse().ok()?;
            let code = cells.get(2)?.trim_matches('`');
            (!code.is_empty()).then(|| (status, code.to_string()))
        })
        .collect();
    listed.sort();
    let mut catalogue: Vec<(u16, String)> = Rejection::CATALOGUE
        .iter()
        .map(|(s, c)| (*s, c.to_string()))
        .collect();
    catalogue.sort();
    assert_eq!(listed, catalogue);
}
