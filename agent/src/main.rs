fn main() -> anyhow::Result<()> {
    nodeward::cli::main()
}
