//! `flashmoe demo`: placeholder until synth lands.
use anyhow::Result;
use clap::Args as ClapArgs;

#[derive(ClapArgs, Debug)]
pub struct Args {}

pub fn run(_a: Args) -> Result<()> {
    anyhow::bail!("demo is not built yet")
}
