//! Runs only the store-alone append scenario of `hushd bench`, for
//! profiling the writer: `perf record -g cargo run --release --example bench_appends`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("hush-appends-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rate = runtime.block_on(hush::bench::durable_appends(&dir, hush::bench::Settings::full()))?;
    println!("durable appends: {rate:.0}/s");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
