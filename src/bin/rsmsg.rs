//! The `rsmsg` command line.
fn main() -> anyhow::Result<()> {
    Ok(())
}
