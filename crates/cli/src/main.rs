//! `flashmoe`: one binary, one subcommand per job. Each subcommand lives in `cmd/`.
mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flashmoe",
    version,
    about = "Run Mixture-of-Experts LLMs larger than memory by streaming experts from SSD",
    long_about = "flashmoe runs Qwen3.5-MoE, Qwen3-Next and Qwen3-MoE models from Hugging Face or MLX \
checkpoints or from its own packed format, keeping only the dense weights resident and reading each \
token's routed experts from disk."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Synthesize a small random Qwen3.5-MoE model and generate from it (no download needed).
    Demo(cmd::demo::Args),
    /// Write the logits of every position of a token sequence to a safetensors file (exact f32
    /// activations unless --int8-activations: this is the command to compare with a reference).
    Logits(cmd::logits::Args),
    /// Print the greedy continuation of a token sequence as ids (exact f32 activations unless
    /// --int8-activations, as `logits`).
    Generate(cmd::generate::Args),
    /// Generate from token ids or a prompt, optionally with a per-layer timing report.
    Run(cmd::run::Args),
    /// Terminal chat with a bash tool (runs only after you confirm) and saved sessions.
    Chat(cmd::chat::Args),
    /// Print the token ids of a text file as a JSON array.
    Tokenize(cmd::tokenize::Args),
    /// Print the prompt the chat template renders for an OpenAI-style request file.
    Render(cmd::render::Args),
    /// Convert a Hugging Face or MLX checkpoint into a packed model that streams experts from disk.
    Pack(cmd::pack::Args),
    /// Download a Hugging Face checkpoint and pack it while it downloads (resumable).
    Pull(cmd::pull::Args),
    /// Write a packed model of random weights at a real model's shapes (for benchmarks).
    Synth(cmd::synth::Args),
    /// Measure kernels, expert I/O, MoE, decode and prefill against this machine's limits.
    Bench(cmd::bench::Args),
    /// List the GPUs flashmoe can use: wgpu adapters (Vulkan, Metal) and CUDA.
    Devices(cmd::devices::Args),
    /// OpenAI-compatible HTTP server (chat and text completions, streaming, tools, metrics).
    Serve(cmd::serve::Args),
    /// Analyse a routing trace (--trace-routing): stats, cache-policy simulation, prediction.
    Trace(cmd::trace::Args),
}

fn main() {
    cmd::out::quiet_broken_pipe_hook();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Logits(a) => cmd::logits::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Render(a) => cmd::render::run(a),
        Command::Pack(a) => cmd::pack::run(a),
        Command::Pull(a) => cmd::pull::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Devices(a) => cmd::devices::run(a),
        Command::Trace(a) => cmd::trace::run(a),
    };
    if let Err(e) = r {
        if cmd::out::is_stdout_closed(&e) {
            std::process::exit(cmd::out::CLOSED_STATUS);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
