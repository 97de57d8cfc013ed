from polyp_ssl.fragments import (
    count_fragments,
    cut_tracklet,
    even_subsample,
    fragment_index_lists,
    video_position,
)


def test_stride_and_length_drop_last():
    assert fragment_index_lists(10, 2, 3, drop_last=True) == [[0, 3], [6, 9]]
    assert fragment_index_lists(11, 3, 2, drop_last=True) == [[0, 2, 4], [6, 8, 10]]
    assert fragment_index_lists(9, 3, 2, drop_last=True) == [[0, 2, 4]]


def test_last_piece_padded_by_repeating_last_frame():
    assert fragment_index_lists(9, 3, 2, drop_last=False) == [[0, 2, 4], [6, 8, 8]]
    assert fragment_index_lists(1, 4, 4, drop_last=False) == [[0, 0, 0, 0]]
    assert fragment_index_lists(1, 4, 4, drop_last=True) == []


def test_whole_tracklet():
    assert fragment_index_lists(10, -1, 4, drop_last=True) == [[0, 4, 8]]
    assert fragment_index_lists(0, -1, 4, drop_last=True) == []


def test_count_matches_lists():
    for n in range(0, 40):
        for length in (-1, 1, 2, 3, 8):
            for stride in (1, 2, 4):
                for drop in (True, False):
                    assert count_fragments(n, length, stride, drop) == len(
                        fragment_index_lists(n, length, stride, drop)
                    ), (n, length, stride, drop)


def test_cut_tracklet_positions_and_min_length():
    frame_ids = list(range(100, 120))
    frags = cut_tracklet(frame_ids, 0, 200, 2, 4, True, min_tracklet_length=20)
    assert [f.frame_indices for f in frags] == [(0, 4), (8, 12)]
    assert [f.first_frame_id for f in frags] == [100, 108]
    assert frags[1].position == 108 / 200
    assert cut_tracklet(frame_ids, 0, 200, 2, 4, True, min_tracklet_length=21) == []


def test_video_position_bounds():
    assert video_position(5, 5, 5) == 0.0
    assert video_position(15, 5, 25) == 0.5
    assert video_position(30, 5, 25) == 1.0


def test_even_subsample():
    assert even_subsample(list(range(10)), 4) == [0, 3, 6, 9]
    assert even_subsample([1, 2], 4) == [1, 2]
    assert even_subsample(list(range(100)), 64)[-1] == 99
    assert len(set(even_subsample(list(range(100)), 64))) == 64
