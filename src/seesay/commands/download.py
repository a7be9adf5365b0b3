"""`seesay download`: fetch a public dataset into the layout `seesay prepare` reads."""

from __future__ import annotations

import argparse

HELP = "download a public captioning dataset (COCO 2014, Flickr8k/30k splits), resumable and verified"

EPILOG = """\
examples:
  seesay download coco --output-dir ./data/coco --extract
  seesay download coco --splits train2014,val2014,test2014 --mirror https://mirror.example.org/coco
  seesay download flickr8k --output-dir ./data/flickr8k --extract
  seesay download aichallenger            # prints where to get it and the layout to use

Partial downloads resume (HTTP Range); a second run skips what is complete. Full COCO 2014
(train+val) needs about 20 GB for the archives and as much again while extracting."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "dataset", choices=["coco", "flickr8k", "flickr30k", "aichallenger"], help="which dataset to fetch"
    )
    parser.add_argument(
        "--output-dir", "-o", default=argparse.SUPPRESS, help="where to put it (default: ./data/<dataset>)"
    )
    parser.add_argument(
        "--splits",
        default="train2014,val2014",
        help="COCO image splits, comma-separated, from train2014,val2014,test2014 "
        "(the caption annotations and Karpathy's split file always come along)",
    )
    parser.add_argument("--extract", action="store_true", help="verify and unpack the archives")
    parser.add_argument(
        "--keep-archives",
        action="store_true",
        help="keep the archives after --extract (default: delete them)",
    )
    parser.add_argument(
        "--mirror",
        default=argparse.SUPPRESS,
        help="base URL replacing each file's original base URL (file names stay)",
    )
    parser.add_argument(
        "--manifest",
        default=argparse.SUPPRESS,
        help='JSON list of {"url", "size", "md5"} replacing the built-in file list (size/md5 may be null)',
    )
    parser.add_argument("--retries", type=int, default=5, help="retries in a row before giving up on a file")
    parser.add_argument(
        "--retry-delay", type=float, default=2.0, help="first retry delay in seconds, doubled on each retry"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds")
    parser.add_argument(
        "--allow-file-urls",
        action="store_true",
        help="let --manifest/--mirror use file:// URLs (a local copy); only http(s) is fetched otherwise",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress display (bars on a terminal, log lines otherwise)"
    )


def run(args: argparse.Namespace) -> int:
    from seesay.data.download import download_dataset

    output = getattr(args, "output_dir", None) or f"data/{args.dataset}"
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    summary = download_dataset(
        args.dataset,
        output,
        splits=splits,
        extract=args.extract,
        keep_archives=args.keep_archives,
        mirror=getattr(args, "mirror", None),
        manifest=getattr(args, "manifest", None),
        retries=args.retries,
        retry_delay=args.retry_delay,
        timeout=args.timeout,
        progress=not args.no_progress,
        allow_file_urls=args.allow_file_urls,
    )
    print(summary)
    return 0
