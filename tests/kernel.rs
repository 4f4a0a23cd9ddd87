#[test]
fn probe() {
    let mut p = xdpfw::testrun::PrivateProgram::load().unwrap();
    for n in [0usize, 1, 10, 13, 14, 15] {
        println!("{n}: {:?}", p.run(&vec![0u8; n]));
    }
}
