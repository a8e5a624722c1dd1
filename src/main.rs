fn main() {
    std::process::exit(lamina::cli::main());
}
