//! Prints the ε of `fl::RdpAccountant` and its order for one setting, for
//! `bench/fl_dp_accountant.py`:
//! `cargo run -p fl --example dp_epsilon -- Q SIGMA ROUNDS DELTA` prints
//! `{"epsilon": E, "order": A}` (ε may be `inf`, which JSON has no word for:
//! it is printed as the string "inf").

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [q, sigma, rounds, delta] = args.as_slice() else {
        eprintln!("usage: dp_epsilon Q SIGMA ROUNDS DELTA");
        return ExitCode::from(2);
    };
    let parsed = (
        q.parse::<f64>(),
        sigma.parse::<f64>(),
        rounds.parse::<u64>(),
        delta.parse::<f64>(),
    );
    let (Ok(q), Ok(sigma), Ok(rounds), Ok(delta)) = parsed else {
        eprintln!("dp_epsilon: Q, SIGMA and DELTA must be numbers and ROUNDS a whole number: {args:?}");
        return ExitCode::from(2);
    };
    let result = fl::RdpAccountant::new(q, sigma).and_then(|mut accountant| {
        accountant.compose(rounds);
        accountant.epsilon(delta)
    });
    match result {
        Ok((epsilon, order)) if epsilon.is_finite() => {
            println!("{{\"epsilon\": {epsilon:?}, \"order\": {order:?}}}");
            ExitCode::SUCCESS
        }
        Ok((_, order)) => {
            println!("{{\"epsilon\": \"inf\", \"order\": {order:?}}}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("dp_epsilon: {err}");
            ExitCode::from(1)
        }
    }
}
