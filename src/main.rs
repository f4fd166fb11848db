#![forbid(unsafe_code)]

fn main() {
    // The modes (webhook, controller, agent) land with their issues; until then the binary only
    // identifies itself rather than pretending to work.
    println!("picotun {}", picotun::VERSION);
}
