// Command decode times one materializing decode of a weights file in a fresh
// process (no memory reused from an earlier decode), for bench/decode.sh.
//
//	decode FILE   prints the seconds weights.ReadFile took
package main

import (
	"fmt"
	"log"
	"os"
	"time"

	"github.com/branchkey/branchkey/weights"
)

func main() {
	if len(os.Args) != 2 {
		log.Fatal("usage: decode FILE")
	}
	t := time.Now()
	u, err := weights.ReadFile(os.Args[1])
	if err != nil {
		log.Fatal(err)
	}
	if u.DataBytes() == 0 {
		log.Fatal("no data")
	}
	fmt.Printf("%.6f\n", time.Since(t).Seconds())
}
