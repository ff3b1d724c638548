"""A small personal-finance instruction dataset made by code: the offline stand-in for finance-alpaca.

Rows have finance-alpaca's fields ({instruction, input, output}, type "alpaca"; gbharti/finance-alpaca
is ~69k such rows, most with an empty input). Here an instruction is a question from one of a dozen
templates (compound growth, a retirement target by the 4% rule, savings, loan payments, price
changes, P/E, dividend yield, inflation, the 50/30/20 budget) with its numbers either in the
instruction or in the input, and the output works the answer out in one or two sentences; a few
rows define a term with an empty input. Numbers are drawn from a seeded generator, so the same seed
gives the same rows, and every output's figure is computed from its row's numbers (the tests check
them against the formulas).

    python -m qlora.finance_dataset --rows 2000 --seed 0 --out finance.jsonl
"""

import argparse
import random

from qlora.sql_dataset import write_jsonl

DEFAULT_ROWS = 2000

TERMS = {
    "a Roth IRA": "a retirement account funded with after-tax money; qualified withdrawals in retirement are tax-free.",
    "an index fund": "a fund that holds every security of a market index, so it earns the market's return at low cost.",
    "compound interest": "interest earned on both the original amount and the interest already added to it.",
    "an emergency fund": "cash set aside for unexpected costs, usually three to six months of expenses.",
    "a bond": "a loan to a company or government that pays fixed interest and returns the principal at maturity.",
    "diversification": "spreading money over many investments so that one loss does not sink the whole portfolio.",
    "a dividend": "a share of a company's profit paid out to its shareholders, usually every quarter.",
    "an expense ratio": "the yearly fee a fund charges, as a percentage of the money invested in it.",
    "a credit score": "a number from 300 to 850 that tells lenders how reliably a person has repaid debt.",
    "inflation": "the rise of prices over time, which lowers what each dollar can buy.",
    "a 401(k)": "an employer-sponsored retirement account funded from pre-tax salary, often with a matching contribution.",
    "net worth": "everything a person owns minus everything they owe.",
}
DEFINE = ("What is {term}?", "Explain {term} in simple terms.", "Define {term}.", "Can you tell me what {term} is?")


def _money(x: float) -> str:
    return f"${x:,.2f}" if x != int(x) else f"${int(x):,}"


def _split(rng: random.Random, question: str, numbers: str, ask: str) -> tuple[str, str]:
    """The numbers in the instruction itself, or the instruction asks and the input gives them."""
    if rng.random() < 0.5:
        return question, ""
    return ask, numbers


def _compound(rng):
    p, r, n = rng.choice([1000, 2500, 5000, 10000, 20000]), rng.choice([3, 4, 5, 6, 7, 8]), rng.randint(2, 30)
    total = round(p * (1 + r / 100) ** n, 2)
    q, i = _split(rng, f"How much will {_money(p)} grow to in {n} years at {r}% annual interest, compounded yearly?",
                  f"Principal: {_money(p)}. Rate: {r}% a year. Years: {n}.",
                  "How much will my investment be worth, compounded yearly?")
    return q, i, f"At {r}% a year, {_money(p)} grows to {_money(total)} after {n} years: {_money(p)} x (1 + {r / 100:g})^{n}."


def _retirement(rng):
    spend = rng.choice(range(20000, 120001, 5000))
    target = spend / 0.04
    q, i = _split(rng, f"How much money do I need to retire if I spend {_money(spend)} a year?",
                  f"Yearly spending in retirement: {_money(spend)}.", "How do I figure out how much money I need to retire?")
    return q, i, (f"By the 4% rule, you need about 25 times your yearly spending: {_money(spend)} / 0.04 = "
                  f"{_money(target)}.")


def _savings(rng):
    m, n = rng.choice(range(100, 2001, 50)), rng.randint(1, 40)
    total = m * 12 * n
    q, i = _split(rng, f"If I save {_money(m)} a month for {n} years, how much will I have put away?",
                  f"Monthly saving: {_money(m)}. Years: {n}.", "How much will I have saved, before any interest?")
    return q, i, f"Saving {_money(m)} a month for {n} years puts away {_money(m)} x 12 x {n} = {_money(total)}, before interest."


def _loan(rng):
    p, r, years = rng.choice(range(5000, 400001, 5000)), rng.choice([3, 4, 5, 6, 7]), rng.choice([5, 10, 15, 20, 30])
    i_m, n = r / 100 / 12, years * 12
    pay = round(p * i_m / (1 - (1 + i_m) ** -n), 2)
    q, i = _split(rng, f"What is the monthly payment on a {_money(p)} loan at {r}% for {years} years?",
                  f"Loan: {_money(p)}. Rate: {r}% a year. Term: {years} years.", "What will my monthly loan payment be?")
    return q, i, (f"The monthly payment is {_money(pay)}: {n} payments at a monthly rate of {r}%/12 repay "
                  f"{_money(p)} with interest.")


def _price_change(rng):
    a, b = rng.randint(10, 500), rng.randint(10, 500)
    change = (b - a) / a * 100
    word = "rose" if b >= a else "fell"
    q, i = _split(rng, f"A stock went from {_money(a)} to {_money(b)}. What is the percentage change?",
                  f"Buy price: {_money(a)}. Sell price: {_money(b)}.", "What was the percentage gain or loss on this stock?")
    return q, i, f"The price {word} by {abs(change):.1f}%: ({_money(b)} - {_money(a)}) / {_money(a)}."


def _pe(rng):
    price, eps = rng.randint(20, 400), rng.choice([1, 2, 2.5, 4, 5, 8, 10])
    q, i = _split(rng, f"What is the P/E ratio of a stock priced at {_money(price)} with earnings of {_money(eps)} per share?",
                  f"Share price: {_money(price)}. Earnings per share: {_money(eps)}.", "Compute the price-to-earnings ratio.")
    return q, i, f"The P/E ratio is {_money(price)} / {_money(eps)} = {price / eps:.1f}."


def _dividend(rng):
    price, div = rng.randint(20, 300), rng.choice([0.5, 1, 1.5, 2, 3, 4])
    q, i = _split(rng, f"A stock costs {_money(price)} and pays {_money(div)} a year in dividends. What is its yield?",
                  f"Price: {_money(price)}. Yearly dividend: {_money(div)}.", "What is the dividend yield?")
    return q, i, f"The dividend yield is {_money(div)} / {_money(price)} = {div / price * 100:.2f}%."


def _inflation(rng):
    cost, r, n = rng.choice(range(100, 5001, 100)), rng.choice([2, 3, 4, 5]), rng.randint(1, 30)
    later = round(cost * (1 + r / 100) ** n, 2)
    q, i = _split(rng, f"With {r}% inflation, what will something that costs {_money(cost)} today cost in {n} years?",
                  f"Price today: {_money(cost)}. Inflation: {r}% a year. Years: {n}.", "What will this cost after inflation?")
    return q, i, f"At {r}% inflation it will cost about {_money(later)} in {n} years: {_money(cost)} x (1 + {r / 100:g})^{n}."


def _budget(rng):
    income = rng.choice(range(1500, 12001, 250))
    q, i = _split(rng, f"How should I split a monthly income of {_money(income)} with the 50/30/20 rule?",
                  f"Monthly take-home pay: {_money(income)}.", "How do I budget my income with the 50/30/20 rule?")
    return q, i, (f"Spend {_money(income * 0.5)} on needs, {_money(income * 0.3)} on wants and save "
                  f"{_money(income * 0.2)}: 50%, 30% and 20% of {_money(income)}.")


def _define(rng):
    term = rng.choice(sorted(TERMS))
    return rng.choice(DEFINE).format(term=term), "", f"{term[0].upper()}{term[1:]} is {TERMS[term]}"


TEMPLATES = (_compound, _retirement, _savings, _loan, _price_change, _pe, _dividend, _inflation, _budget, _define)


def finance_rows(n: int = DEFAULT_ROWS, seed: int = 0) -> list[dict]:
    """n rows of {instruction, input, output}, the templates taken in turn."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        instruction, input, output = TEMPLATES[k % len(TEMPLATES)](rng)
        rows.append({"instruction": instruction, "input": input, "output": output})
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="a .jsonl file")
    args = p.parse_args(argv)
    write_jsonl(finance_rows(args.rows, args.seed), args.out)


if __name__ == "__main__":
    main()
