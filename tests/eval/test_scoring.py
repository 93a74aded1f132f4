import pytest

from sala.eval.scoring import contains_answer, normalize, sample_score, string_match_all


def test_exact_and_embedded_answers_match():
    assert contains_answer("The pass key is 12345.", "12345")
    assert contains_answer("12345", "12345")
    assert contains_answer("key: 12345, done", "12345")


@pytest.mark.parametrize("pred", ["123456", "012345", "The pass key is 1234567.", "12345abc", "x12345"])
def test_longer_numbers_and_words_are_near_misses(pred):
    assert not contains_answer(pred, "12345")


def test_case_and_whitespace_are_ignored():
    assert contains_answer("THE WORDS ARE:  Apple,\n banana", "apple")
    assert contains_answer("the  magic\n\tnumber", "Magic Number")
    assert not contains_answer("apples", "apple")
    assert normalize("  A\n\tB  ") == "a b"


def test_partial_credit_like_ruler_string_match_all():
    assert sample_score("1111111 and 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert string_match_all(["1111111", "nothing"], [["1111111"], ["2222222"]]) == 50.0
    assert string_match_all(["a b c"], [["a", "b", "c"]]) == 100.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        sample_score("x", [])
    with pytest.raises(ValueError):
        string_match_all(["x"], [])
    with pytest.raises(ValueError):
        contains_answer("x", "  ")


def test_wilson_interval_known_values_and_errors():
    import pytest

    from sala.eval.scoring import wilson_interval

    lo, hi = wilson_interval(0, 16)
    assert lo == 0.0 and hi == pytest.approx(0.1936, abs=1e-4)  # the textbook 0/16 upper bound
    lo, hi = wilson_interval(16, 16)
    assert hi == 1.0 and lo == pytest.approx(0.8064, abs=1e-4)
    lo, hi = wilson_interval(11, 16)  # 69%: 44% to 86%
    assert (round(lo, 2), round(hi, 2)) == (0.44, 0.86)
    for bad in ((1, 0), (-1, 4), (5, 4)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
