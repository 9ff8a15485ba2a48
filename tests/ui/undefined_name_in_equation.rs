rnn::rnn! {
    struct Cell {
        input: 3,
        hidden: 4,
        param W: [hidden, input],
        param U: [hidden, hidden],
        state h,
        h = tanh(W @ x + V @ h),
    }
}

fn main() {}
