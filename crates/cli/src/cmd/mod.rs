//! Subcommands, one file each, plus the options they share.
pub mod backend;
pub mod bench;
pub mod chat;
pub mod common;
pub mod demo;
mod demo_vocab;
pub mod generate;
pub mod logits;
pub mod out;
pub mod pack;
pub mod progress;
pub mod render;
pub mod run;
pub mod sampling;
pub mod serve;
pub mod synth;
pub mod tokenize;
pub mod tools;
