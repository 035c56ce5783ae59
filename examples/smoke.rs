#[global_allocator]
static GLOBAL: coreheap::CoreHeap = coreheap::CoreHeap::new();
fn main() {
    let mut v: Vec<Vec<u8>> = Vec::new();
    for i in 0..100000usize {
        v.push(vec![(i % 251) as u8; i % 5000 + 1]);
    }
    for (i, b) in v.iter().enumerate() {
        assert!(b.iter().all(|&x| x == (i % 251) as u8));
    }
    let big = vec![7u8; 10 << 20];
    drop(v);
    println!("{}", big.len());
    coreheap::check_heap().unwrap();
    print!("{}", coreheap::stats());
}
