package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
	"github.com/spf13/cobra"
)

// adminFlags are the flags every admin command shares.
type adminFlags struct {
	server string
	token  string
	json   bool
}

func (f *adminFlags) client() (*client.Admin, error) {
	if f.token == "" {
		return nil, fmt.Errorf("no admin token: set --admin-token or BRANCHKEY_ADMIN_TOKEN")
	}
	return client.NewAdmin(f.server, f.token, nil)
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func newAdminCmd() *cobra.Command {
	f := &adminFlags{}
	cmd := &cobra.Command{
		Use:   "admin",
		Short: "Manage trees, branches, leaves and runs on a server",
		Long: `admin calls a branchkey server's admin API. It reads the server from --server
or BRANCHKEY_SERVER (default http://127.0.0.1:8080) and the admin token from
--admin-token or BRANCHKEY_ADMIN_TOKEN. --json prints machine-readable output.`,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.server, "server", envOr("BRANCHKEY_SERVER", "http://127.0.0.1:8080"), "server base URL")
	pf.StringVar(&f.token, "admin-token", os.Getenv("BRANCHKEY_ADMIN_TOKEN"), "admin API token")
	pf.BoolVar(&f.json, "json", false, "print JSON")
	cmd.AddCommand(adminTreeCmd(f), adminBranchCmd(f), adminLeafCmd(f), adminRunCmd(f))
	return cmd
}

// adminRun wraps an admin action: it builds the client and prints the
// result as JSON or with human.
func adminRun(f *adminFlags, nargs int, act func(ctx context.Context, a *client.Admin, args []string) (any, error), human func(w io.Writer, v any)) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		a, err := f.client()
		if err != nil {
			return err
		}
		v, err := act(cmd.Context(), a, args)
		if err != nil {
			return err
		}
		out := cmd.OutOrStdout()
		if f.json {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			enc.SetEscapeHTML(false)
			return enc.Encode(v)
		}
		human(out, v)
		return nil
	}
}

func printDone(what string) func(io.Writer, any) {
	return func(w io.Writer, _ any) { fmt.Fprintln(w, what) }
}

func adminTreeCmd(f *adminFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "tree", Short: "Create, list and delete trees"}
	cmd.AddCommand(
		&cobra.Command{Use: "create TREE_ID", Short: "Create a tree", Args: cobra.ExactArgs(1),
			RunE: adminRun(f, 1, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return a.CreateTree(ctx, args[0])
			}, func(w io.Writer, v any) { fmt.Fprintf(w, "tree %s created\n", v.(*branchkey.Tree).ID) })},
		&cobra.Command{Use: "list", Short: "List trees", Args: cobra.NoArgs,
			RunE: adminRun(f, 0, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return a.ListTrees(ctx)
			}, func(w io.Writer, v any) {
				for _, t := range v.([]*branchkey.Tree) {
					fmt.Fprintln(w, t.ID)
				}
			})},
		&cobra.Command{Use: "delete TREE_ID", Short: "Delete a tree with its branches, leaves and files", Args: cobra.ExactArgs(1),
			RunE: adminRun(f, 1, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return map[string]string{"deleted": args[0]}, a.DeleteTree(ctx, args[0])
			}, printDone("tree deleted"))},
	)
	return cmd
}

func adminBranchCmd(f *adminFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "branch", Short: "Create, list, show and delete branches"}
	var spec client.BranchSpec
	var minUpdates int
	var opts []string
	create := &cobra.Command{
		Use:   "create TREE_ID BRANCH_ID",
		Short: "Create a branch with its round policy",
		Long: `create makes a branch. Its rounds aggregate once --min-updates distinct leaves
uploaded (default 2), or --max-wait after the round's first update if at least
--min-quorum leaves did. --sample-size K aggregates K of the round's updates
chosen at random (default all). --strategy picks the aggregation strategy
(fedavg by default; see "branchkey aggregate --help") and --option KEY=VALUE
sets its options (trim=0.1, byzantine=1, server-lr=0.1, ...). The run starts
at once unless --paused.`,
		Args: cobra.ExactArgs(2),
		RunE: adminRun(f, 2, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
			spec.ID = args[1]
			if minUpdates > 0 {
				spec.MinUpdates = &minUpdates
			}
			spec.StrategyOptions = map[string]string{}
			for _, o := range opts {
				k, v, ok := strings.Cut(o, "=")
				if !ok {
					return nil, fmt.Errorf("--option %q: use KEY=VALUE", o)
				}
				spec.StrategyOptions[strings.TrimLeft(k, "-")] = v
			}
			return a.CreateBranch(ctx, args[0], spec)
		}, func(w io.Writer, v any) { printBranch(w, v.(*client.BranchInfo)) }),
	}
	fl := create.Flags()
	fl.IntVar(&minUpdates, "min-updates", 0, "aggregate once this many distinct leaves uploaded (default 2)")
	fl.IntVar(&spec.SampleSize, "sample-size", 0, "aggregate this many of the round's updates, chosen at random (0: all)")
	fl.StringVar(&spec.MaxWait, "max-wait", "", "aggregate this long after the round's first update (e.g. 10m), with --min-quorum")
	fl.IntVar(&spec.MinQuorum, "min-quorum", 0, "fewest leaves a --max-wait round aggregates (default 1)")
	fl.StringVar(&spec.Strategy, "strategy", "", "aggregation strategy (default fedavg)")
	fl.StringArrayVarP(&opts, "option", "o", nil, "strategy option KEY=VALUE (repeatable)")
	fl.BoolVar(&spec.AllowNonFinite, "allow-non-finite", false, "accept updates holding NaN or Inf")
	fl.BoolVar(&spec.Paused, "paused", false, "create the branch with its run paused")

	cmd.AddCommand(create,
		&cobra.Command{Use: "list TREE_ID", Short: "List a tree's branches", Args: cobra.ExactArgs(1),
			RunE: adminRun(f, 1, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return a.ListBranches(ctx, args[0])
			}, func(w io.Writer, v any) {
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "BRANCH\tRUN\tROUND\tSTRATEGY\tMIN_UPDATES\tSAMPLE\tMAX_WAIT")
				for _, b := range v.([]*client.BranchInfo) {
					fmt.Fprintf(tw, "%s\t%s #%d\t%d\t%s\t%d\t%d\t%s\n", b.ID, b.RunStatus, b.RunNumber, b.Round, b.Policy.Strategy, b.Policy.MinUpdates, b.Policy.SampleSize, b.MaxWait)
				}
				tw.Flush()
			})},
		&cobra.Command{Use: "show TREE_ID BRANCH_ID", Short: "Show a branch, its round and last aggregation", Args: cobra.ExactArgs(2),
			RunE: adminRun(f, 2, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return a.ShowBranch(ctx, args[0], args[1])
			}, func(w io.Writer, v any) { printBranch(w, v.(*client.BranchInfo)) })},
		&cobra.Command{Use: "delete TREE_ID BRANCH_ID", Short: "Delete a branch with its leaves and files", Args: cobra.ExactArgs(2),
			RunE: adminRun(f, 2, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return map[string]string{"deleted": args[1]}, a.DeleteBranch(ctx, args[0], args[1])
			}, printDone("branch deleted"))},
	)
	return cmd
}

func printBranch(w io.Writer, b *client.BranchInfo) {
	p := b.Policy
	fmt.Fprintf(w, "branch %s (tree %s)\n", b.ID, b.TreeID)
	fmt.Fprintf(w, "  run:       %s, run %d, round %d\n", b.RunStatus, b.RunNumber, b.Round)
	fmt.Fprintf(w, "  policy:    min_updates=%d sample_size=%d max_wait=%s min_quorum=%d allow_non_finite=%v\n", p.MinUpdates, p.SampleSize, b.MaxWait, p.MinQuorum, p.AllowNonFinite)
	fmt.Fprintf(w, "  strategy:  %s %v\n", p.Strategy, p.StrategyOptions)
	if r := b.CurrentRound; r != nil {
		fmt.Fprintf(w, "  round %d:  %s, %d updates\n", r.Round, r.Status, r.Count)
	}
	if a := b.LastAggregation; a != nil {
		fmt.Fprintf(w, "  last aggregate: %s (round %d, %d updates, num_samples %d, %s, %.3fs)\n", a.ID, a.Round, len(a.Inputs), a.NumSamples, a.Mode, a.Duration.Seconds())
	}
}

// readPasswordStdin reads one line from stdin as a password.
func readPasswordStdin(in io.Reader) (string, error) {
	line, err := bufio.NewReader(in).ReadString('\n')
	if err != nil && err != io.EOF {
		return "", err
	}
	pw := strings.TrimRight(line, "\r\n")
	if pw == "" {
		return "", fmt.Errorf("--password-stdin: no password on standard input")
	}
	return pw, nil
}

func adminLeafCmd(f *adminFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "leaf", Short: "Create, list and delete leaves; reset passwords"}
	printLeaf := func(w io.Writer, v any) {
		l := v.(*client.NewLeaf)
		fmt.Fprintf(w, "leaf %s in tree %s, branch %s\n", l.Name, l.TreeID, l.BranchID)
		fmt.Fprintf(w, "  id:       %s\n", l.ID)
		fmt.Fprintf(w, "  password: %s\n", l.Password)
		fmt.Fprintln(w, "The password is shown only now: store it with the leaf's credentials.")
	}
	var stdinPW bool
	create := &cobra.Command{
		Use:   "create TREE_ID BRANCH_ID LEAF_NAME",
		Short: "Create a leaf; prints its password once",
		Long: `create makes a leaf in a branch. Without --password-stdin a strong password
is generated and printed once. Leaf names are unique across the server.`,
		Args: cobra.ExactArgs(3),
		RunE: adminRun(f, 3, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
			pw := ""
			if stdinPW {
				var err error
				if pw, err = readPasswordStdin(os.Stdin); err != nil {
					return nil, err
				}
			}
			return a.CreateLeaf(ctx, args[0], args[1], args[2], pw)
		}, printLeaf),
	}
	create.Flags().BoolVar(&stdinPW, "password-stdin", false, "read the password from standard input")
	var resetStdin bool
	reset := &cobra.Command{
		Use:   "reset-password TREE_ID BRANCH_ID LEAF_NAME",
		Short: "Give a leaf a new password and revoke its tokens",
		Args:  cobra.ExactArgs(3),
		RunE: adminRun(f, 3, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
			pw := ""
			if resetStdin {
				var err error
				if pw, err = readPasswordStdin(os.Stdin); err != nil {
					return nil, err
				}
			}
			return a.ResetPassword(ctx, args[0], args[1], args[2], pw)
		}, printLeaf),
	}
	reset.Flags().BoolVar(&resetStdin, "password-stdin", false, "read the password from standard input")
	cmd.AddCommand(create, reset,
		&cobra.Command{Use: "list TREE_ID BRANCH_ID", Short: "List a branch's leaves", Args: cobra.ExactArgs(2),
			RunE: adminRun(f, 2, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return a.ListLeaves(ctx, args[0], args[1])
			}, func(w io.Writer, v any) {
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tID\tCREATED")
				for _, l := range v.([]*branchkey.Leaf) {
					fmt.Fprintf(tw, "%s\t%s\t%s\n", l.Name, l.ID, l.CreatedAt.Format("2006-01-02 15:04:05"))
				}
				tw.Flush()
			})},
		&cobra.Command{Use: "delete TREE_ID BRANCH_ID LEAF_NAME", Short: "Delete a leaf, its tokens and broker queue", Args: cobra.ExactArgs(3),
			RunE: adminRun(f, 3, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return map[string]string{"deleted": args[2]}, a.DeleteLeaf(ctx, args[0], args[1], args[2])
			}, printDone("leaf deleted"))},
	)
	return cmd
}

func adminRunCmd(f *adminFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "run", Short: "Start, pause or stop a branch's training run"}
	for _, st := range []struct {
		status branchkey.RunStatus
		short  string
	}{
		{branchkey.RunStarted, "Start (or resume) the run; after a stop, a new run begins"},
		{branchkey.RunPaused, "Pause the run: uploads are refused until it starts again"},
		{branchkey.RunStopped, "Stop the run: its open round is abandoned"},
	} {
		cmd.AddCommand(&cobra.Command{Use: string(st.status) + " TREE_ID BRANCH_ID", Short: st.short, Args: cobra.ExactArgs(2),
			RunE: adminRun(f, 2, func(ctx context.Context, a *client.Admin, args []string) (any, error) {
				return a.SetRun(ctx, args[0], args[1], st.status)
			}, func(w io.Writer, v any) {
				b := v.(*client.BranchInfo)
				fmt.Fprintf(w, "branch %s: run %d %s, round %d\n", b.ID, b.RunNumber, b.RunStatus, b.Round)
			})})
	}
	return cmd
}
