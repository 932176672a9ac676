fn main() -> std::process::ExitCode {
    instruct_pix2pix::cli::main()
}
